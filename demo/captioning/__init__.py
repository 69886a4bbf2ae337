"""Batch video captioning behind ``vlmcompress-caption`` (``demo/caption.py`` is the command line).

One job per module: :mod:`.inputs` turns paths, folders, globs and list files into work items;
:mod:`.decode` reads the sampled frames of one video (time-based, resized while decoding);
:mod:`.records` owns the output (resume keys, torn lines, the lock); :mod:`.engine` loads the model and
captions batches on this machine with a background decoder; :mod:`.ray_engine` runs the same engine on
Ray Data, one model replica per worker.
"""
