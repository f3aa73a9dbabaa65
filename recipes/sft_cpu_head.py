"""Score only the supervised positions in TRL's fused LM head on CPU.

TRL's SFTTrainer replaces the model's LM head with a chunked log-prob kernel. On devices with Triton (CUDA, XPU) it
projects only the positions whose label is not -100; elsewhere it projects every position, to keep tile shapes
static for compilers such as Neuron's. On CPU nothing recompiles, and in SFT only the assistant tokens are
supervised (a few percent of the positions once the image placeholders are counted), so projecting everything onto
the 151,936-row vocabulary is wasted: on the demo's tiny model an SFT step runs about 50x faster with compact scoring.
Loss and gradients are identical (masked positions contribute exactly zero either way).
"""

from __future__ import annotations


def enable_compact_lm_head_on_cpu() -> bool:
    """Make TRL's fused LM head score only supervised positions on CPU. Idempotent; returns True if it patched.

    Only the *compact* decision in ``trl.trainer.utils`` is changed: the kernel itself still picks its torch (not
    Triton) tiles on CPU, because ``trl.kernels.chunked_logprob`` keeps its own reference to the device check.
    """
    import trl.trainer.utils as trl_utils

    current = getattr(trl_utils, "_use_triton", None)
    if current is None or getattr(current, "_compact_on_cpu", False):
        return False

    def compact_scoring(device) -> bool:
        return device.type == "cpu" or current(device)

    compact_scoring._compact_on_cpu = True
    compact_scoring.__wrapped__ = current  # TRL's own decision, for callers that need it back
    trl_utils._use_triton = compact_scoring
    return True
