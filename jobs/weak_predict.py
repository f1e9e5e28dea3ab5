r"""Ray job entry point: a cohort through a trained weak ensemble.

    ray job submit --working-dir . -- python jobs/weak_predict.py --model models:/busi-weak@champion \
        --input s3://bucket/busi/test/ --output s3://bucket/weak/busi-test/ --gt s3://bucket/busi/test_labels/

Takes exactly the options of ``medclipsam weak predict`` and joins the cluster the job runs on.
"""

import sys

from medclipsam.cli import main

if __name__ == "__main__":
    main(["weak", "predict", *sys.argv[1:]])
