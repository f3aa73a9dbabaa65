"""lmms-eval registration of the Open-Qwen2VL plugin.

lmms-eval 0.7 resolves ``--model`` names through its V2 registry, which reads the ``lmms_eval.models`` entry-point
group (the legacy ``@register_model`` decorator is not seen by the evaluator). The kit's packaging declares::

    [options.entry_points]
    lmms_eval.models =
        open_qwen2vl = recipes.evaluation.lmms_eval_manifest:MANIFESTS

Without an installed distribution (e.g. in tests), call ``register()`` instead.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

from .lmms_eval_compat import ensure_filelock_api

ensure_filelock_api()

MANIFESTS = [
    ModelManifest(
        model_id="open_qwen2vl",
        simple_class_path="recipes.evaluation.lmms_eval_plugin.OpenQwen2VLLmms",
        aliases=("open-qwen2vl",),
    )
]


def register(registry=None) -> None:
    """Add the manifests to lmms-eval's model registry (``lmms_eval.models.MODEL_REGISTRY_V2`` by default)."""
    if registry is None:
        from lmms_eval.models import MODEL_REGISTRY_V2 as registry
    for manifest in MANIFESTS:
        registry.register_manifest(manifest, overwrite=True)
