# Two commands on a fresh machine: `make demo` (set up + the main job on the embedded
# benchmark) and `make test` (set up + the test suite). Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build on machines without a GPU (a CUDA build works too: TORCH_SPEC="torch==2.13.0
# torchvision==0.28.0" from an index with CUDA wheels). torchvision is pinned with torch: left
# free, the registry's newest torchvision requires a newer torch and pip would replace the CPU
# build with a CUDA one (several GB of nvidia packages).
TORCH_SPEC ?= torch==2.13.0 torchvision==0.28.0
STAMP := $(VENV)/.installed
DIGITS := data/digits-c
DEMO := results/demo

.PHONY: setup demo test bench clean gpu-wheels

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip freeze | grep -E '^(torch|torchvision)==' > $(VENV)/torch-pins.txt
	$(BIN)/pip install -q -c constraints.txt -c $(VENV)/torch-pins.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

$(DIGITS)/manifest.json: | $(STAMP)
	$(BIN)/dusa prepare-data digits-c --output $(DIGITS)

demo: $(STAMP) $(DIGITS)/manifest.json
	rm -rf $(DEMO)
	for method in source norm tent; do \
		$(BIN)/dusa baseline --config configs/cls/digits.yaml --method $$method --output $(DEMO)/$$method --quiet > /dev/null || exit 1; \
	done
	for method in eata sar rotta; do \
		$(BIN)/dusa baseline --config configs/cls/$${method}_digits.yaml --output $(DEMO)/$$method --quiet > /dev/null || exit 1; \
	done
	$(BIN)/dusa adapt-cls --config configs/cls/dusa_digits.yaml --output $(DEMO)/dusa > /dev/null
	$(BIN)/dusa report $(DEMO)/source $(DEMO)/norm $(DEMO)/tent $(DEMO)/eata $(DEMO)/sar $(DEMO)/rotta $(DEMO)/dusa

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info

# Side-by-side throughput of the official and the fast DUSA recipe, and the segmentation window
# update (paper shapes on a GPU, tiny models on a CPU). Figures go in docs/BENCHMARKS.md.
bench: $(STAMP)
	if $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/dusa bench cls --output results/bench_cls.json && \
		$(BIN)/dusa bench seg --output results/bench_seg.json; \
	else \
		$(BIN)/dusa bench cls --tiny --updates 1 --warmup 0 --output results/bench_cls_tiny.json && \
		$(BIN)/dusa bench seg --tiny --updates 1 --warmup 0 --output results/bench_seg_tiny.json; \
	fi

# The packages dusa needs that the lent GPU machine lacks (device README: Python 3.12 there, no
# package index), and typer, which it has at a version no one has read (dusa needs 0.29), at
# constraints.txt's versions, as wheels in .whl/ to carry; scripts/on-device.sh installs them
# there, ahead of the machine's own (docs/BENCHMARKS.md, "Paper-sized runs on a GPU").
GPU_WHEELS := diffusers pydantic pydantic_core annotated-types typing-inspection typing_extensions typer \
	importlib_metadata lazy-importer zipp imagecorruptions-imaug
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-c constraints.txt -d .whl $(GPU_WHEELS)
