"""Each method's own pieces, one folder per method: plain torch/numpy code (pairs, regions, losses, pictures)
that knows nothing of nnU-Net's trainer. The trainers are in `trainers/<method>.py`."""
