r"""Ray job entry point: pseudo-label a cohort with the Ray Data pipeline.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pseudolabel.py \
        --config breast_ultrasound --input s3://bucket/cohort/ --output s3://bucket/runs/busi/

Takes exactly the options of ``medclipsam pseudolabel`` and joins the cluster the job runs on.
"""

import sys

from medclipsam.cli import main

if __name__ == "__main__":
    main(["pseudolabel", *sys.argv[1:]])
