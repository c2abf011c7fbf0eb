"""Where models are found: the BentoML model store, by tag. (The model core itself reads
only folders.)"""
