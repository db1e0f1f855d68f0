"""The store: Zarr (v3) read through xarray, its layout, locks and claims. Knows nothing of torch.func."""
