r"""Ray job entry point: segmentation of a cohort, box/point-prompted or text-driven.

    ray job submit --entrypoint-num-gpus 1 -- python jobs/segment.py \
        --input s3://bucket/cohort/ --output s3://bucket/run/ --boxes s3://bucket/boxes.csv \
        --backend litemedsam --device cuda

Takes exactly the options of ``medclipsam segment`` (see ``python jobs/segment.py --help``)
and runs in the job's driver process.
"""

import sys

from medclipsam.cli import main

if __name__ == "__main__":
    main(["segment", *sys.argv[1:]])
