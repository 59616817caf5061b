"""Datasets: readers (`datasets`) and benchmark builders (`digits`, `imagenet_c`)."""
