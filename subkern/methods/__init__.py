"""Reference training code of the sparse methods subkern implements (one subpackage each).

``edgepopup``: "What's Hidden in a Randomly Weighted Neural Network?" (Ramanujan et al., 2020).
``str``: "Soft Threshold Weight Reparameterization for Learnable Sparsity" (Kusupati et al., 2020).
"""
