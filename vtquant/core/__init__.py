"""Model-family-free core of vtquant.

Nothing in this package imports timm, open_clip or transformers: adapters in
:mod:`vtquant.adapters` translate a concrete model into the generic pieces
(blocks, probe modules, Linear targets, token layout) that the core works on.
"""
