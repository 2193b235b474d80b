"""Recording: the Keras callback and everything it runs inside the training loop.

:mod:`~layerwatch.record.callback` holds ``LayerWatch``; it finds the layers
(:mod:`~layerwatch.record.extractor`), builds the probe pass
(:mod:`~layerwatch.record.probe_pass`), fuses it into TensorFlow's train step
(:mod:`~layerwatch.record.fused`), counts steps, meters the time budget and
hands snapshots to :mod:`layerwatch.store`. Nothing is imported here, so
``layerwatch.record.probes`` loads without Keras.
"""
