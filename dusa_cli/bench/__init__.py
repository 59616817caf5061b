"""`dusa bench`: the DUSA update at the papers' shapes with random weights, recipes timed side by
side in one process (cls.py: classification, seg.py: a segmentation window; timing.py: what
both share). The benches build the DUSA methods by name, so they sit beside the engine, which
knows none."""
