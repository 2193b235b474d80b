"""Analysis: numbers about a recording — drift (CKA), health (dead and saturated
channels), how much saliency and Grad-CAM fall on the probes' strokes, and the
``layerwatch info`` summary. Pure functions over what
:mod:`layerwatch.store` reads; no Keras.
"""
