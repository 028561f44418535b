"""Sample quality: FID, a classifier-feature Frechet distance and label accuracy."""
