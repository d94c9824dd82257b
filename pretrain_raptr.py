"""RaPTr GPT pretraining on Megatron-Core.

    torchrun --nproc-per-node N pretrain_raptr.py [Megatron-LM flags] --raptr-schedule 6@0,8@0.25,10@0.5,12@0.75

Without --raptr-schedule it trains the full model at every step: the baseline.
"""

import warnings

# Without Transformer Engine or Apex, several Megatron-Core modules warn in every process that
# they fall back to torch; pretrain() names the fallbacks once instead.
warnings.filterwarnings("ignore", r"(Transformer Engine and Apex are|Apex is) not installed", UserWarning,
                        r"megatron\.core\.")

from megatron_raptr.training.loop import main  # noqa: E402  (after the filter: the warnings come at import)

if __name__ == "__main__":
    main()
