"""Release bundles: bundle (build, verify, load), manifest, model card, and the regression gate."""
