"""Evaluation metrics, one module per measure (import the module you need).

- ``features``: InceptionV3 (TF FID weights) features and their documented input convention.
- ``fid``: feature statistics and the Frechet distance (FID).
- ``kid``: Kernel Inception Distance (unbiased polynomial-kernel MMD^2 over subsets).
- ``precision_recall``: improved precision and recall (k-NN manifolds).
- ``reference``: reference features/statistics of a real image set, cached by input hash.
- ``recon``: per-image PSNR and SSIM of reconstructions.
"""
