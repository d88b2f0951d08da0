"""Training pe-node's model: synthetic CTPA phantoms and the RSPECT data set layout they share with the real data."""
