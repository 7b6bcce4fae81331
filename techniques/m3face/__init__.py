"""M3Face (arXiv 2402.02369): text or photo -> face condition map -> FaceControlNet generation, editing, Imagic."""
