"""Evaluation and calibration data, used by ``fitness`` (scoring) and ``merge`` (SparseGPT calibration).

``spec.py``: :class:`DataSpec`, :class:`HubDataset`, :func:`parse_data_arg` (torch-free);
``records.py``: a spec's documents as text; ``windows.py``: :class:`TokenWindows`, :func:`load_windows`
(tokenised, cached). Import the names from their modules (this package imports nothing, so the
torch-free spec stays torch-free).
"""
