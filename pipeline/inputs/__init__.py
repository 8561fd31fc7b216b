"""Reading and decoding the data: the source kinds (a registry), WebDataset tars, images and clips."""
