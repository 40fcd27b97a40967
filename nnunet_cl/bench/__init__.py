"""`nnUNetv2_cl_benchmark`: design (test set, folds, the arms table, plans), runner, report."""
