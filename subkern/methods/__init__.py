"""Reference training code of the sparse methods subkern implements (one subpackage each).

``edgepopup``: "What's Hidden in a Randomly Weighted Neural Network?" (Ramanujan et al., 2020).
"""
