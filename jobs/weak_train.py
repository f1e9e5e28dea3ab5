r"""Ray job entry point: nnU-Net on the pseudo-labels of a pseudolabel run (the weak stage).

    ray job submit --working-dir . -- python jobs/weak_train.py --pseudo s3://bucket/runs/busi/ \
        --output s3://bucket/weak/busi/ --config weak --workers 4 --gpu --register busi-weak

Takes exactly the options of ``medclipsam weak train`` and joins the cluster the job runs on.
"""

import sys

from medclipsam.cli import main

if __name__ == "__main__":
    main(["weak", "train", *sys.argv[1:]])
