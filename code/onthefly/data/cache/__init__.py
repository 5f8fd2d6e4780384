"""The preprocessed dataset cache: format, writer, checked reader, training Dataset, registration.

A cache is one directory made by `code/preprocess.py`:

    meta.json     what made it: dataset, every preprocessing parameter, the arrays
                  (file, shape, dtype, size, fingerprint, sha1), class names, split counts,
                  and a checksum of itself. Written last: a directory without it is unfinished.
    index.json    per clip: id, label, split, group, source file; frame offsets; class names.
    audio.npy     float16 (N, 1, F, T) log-magnitude spectrograms     (audio datasets)
    visual.npy    uint8  (M, 3, S, S) RGB frames of all clips, concatenated, channel-planar
    flow.npy      uint8  (M, 2, S, S) optical flow u/v frames           (UCF101)
    skipped.tsv   the clips that could not be used and why.

Frame arrays are ragged: clip i owns rows offsets[i]:offsets[i+1]. Frames are stored
channel-planar, so a crop becomes the loader's (C, T, H, W) layout with plain row copies.
Everything is read through numpy memory maps: a training sample costs a few slices and
copies, with no decoding, no librosa, no PIL.

    format.py        names, constants, fingerprints
    writer.py        CacheWriter (preprocessing's side)
    reader.py        read_meta, CacheReader, verify_cache (every check before training)
    dataset.py       CachedClips, one split as a torch Dataset
    registration.py  the five cached datasets in the registry, with their training defaults

This package imports neither librosa, OpenCV nor PyAV: training from a cache needs none. Its
modules are imported by name (the package itself imports nothing): preprocessing uses format,
writer and reader without torch, which dataset and registration need.
"""
