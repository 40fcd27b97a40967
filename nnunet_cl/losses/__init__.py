"""Contrastive losses. One masked core (``masked_supcon``); every method is an instance of it."""
from nnunet_cl.losses.info_nce import info_nce_two_views
from nnunet_cl.losses.masked_supcon import labels_to_pos_mask, masked_supcon

__all__ = ["masked_supcon", "labels_to_pos_mask", "info_nce_two_views"]
