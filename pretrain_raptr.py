"""RaPTr GPT pretraining on Megatron-Core.

    torchrun --nproc-per-node N pretrain_raptr.py [Megatron-LM flags] --raptr-schedule 6@0,8@0.25,10@0.5,12@0.75

Without --raptr-schedule it trains the full model at every step: the baseline.
"""

from megatron_raptr.training.loop import main

if __name__ == "__main__":
    main()
