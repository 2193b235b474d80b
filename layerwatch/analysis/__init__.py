"""Analysis: numbers about a recording — drift (CKA), health (dead and saturated
channels) and the ``layerwatch info`` summary. Pure functions over what
:mod:`layerwatch.store` reads; no Keras.
"""
