r"""Ray job entry point: DHN-NCE fine-tuning of BiomedCLIP.

    ray job submit -- python jobs/finetune.py --config finetune \
        --pairs s3://bucket/pairs.parquet --workers 4 --gpu --storage s3://bucket/finetune/

Takes exactly the options of ``medclipsam finetune`` and joins the cluster the job runs on.
"""

import sys

from medclipsam.cli import main

if __name__ == "__main__":
    main(["finetune", *sys.argv[1:]])
