"""Ray actors that re-encode the corpus with the latest doc encoder, and the refresh coordinator."""
