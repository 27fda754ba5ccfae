"""The offline demo and its support code: synthetic shapes, tiny-CLIP pretraining and tiny local models.

Nothing here is needed to caption real images; it exists so the whole pipeline (and the test
suite) runs with no network: `run` drives the demo, `cli` is `prefixcap demo`, `shapes` draws and
words one shape image, `synthetic` writes the dataset of them (`scenes`: of several shapes),
`clip_pretrain` trains a tiny CLIP stand-in, `tiny_models` builds tiny random models with real
tokenizers.
"""

from prefixcap import lazy_exports

_LAZY = {"DemoConfig": "prefixcap.demo.run", "DemoResult": "prefixcap.demo.run", "run_demo": "prefixcap.demo.run"}
__getattr__ = lazy_exports(__name__, _LAZY)
__all__ = sorted(_LAZY)
