"""Export stage: an SIA dataset composed onto normal images, in a folder layout."""
