"""The offline demo and its support code: synthetic shapes, tiny-CLIP pretraining and tiny local models.

Nothing here is needed to caption real images; it exists so the whole pipeline (and the test
suite) runs with no network: `run` drives the demo, `cli` is `prefixcap demo`, `synthetic` draws
the dataset, `clip_pretrain` trains a tiny CLIP stand-in, `tiny_models` builds tiny random models
with real tokenizers.
"""
