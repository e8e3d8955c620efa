"""MS COCO 2014 as a dataset in VOC layout (``python -m coco14.prepare``)."""
