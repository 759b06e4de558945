"""Torch helpers in the layout of NVlabs' `torch_utils` (EDM pickles import `torch_utils.persistence`)."""
