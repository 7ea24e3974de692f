"""Runs every tbd_ops benchmark into one table, CSV and PNG.

    python benchmarks/run_all.py [--device cpu|cuda] [--quick] [--full] [--providers ...]
        [--modes ...] [--filter REGEX] [--out-dir DIR] [--no-plot]

Default device: CUDA when available, else CPU. Results go to
benchmarks/results/bench_<device>.csv and .png (bench_<device>_quick.* with --quick).
On CPU a trimmed selection of cases runs by default (printed as notes); --full runs the
whole matrix that CUDA runs.
"""
import sys

import harness
import bench_channel_max_spatial_softmax
import bench_decode_max_iou

MODULES = [bench_channel_max_spatial_softmax, bench_decode_max_iou]

if __name__ == "__main__":
    sys.exit(harness.exit_code(harness.main(MODULES, description=__doc__.split("\n")[0])))
