"""Image folders → tensors with the model's own preprocessing; packaged data sets.

``images``: the photo path (timm's eval transform, RGB conversion of every image mode, image
folders, calibration samples). ``fashion_mnist``: Debian's Fashion-MNIST, with its own
batch-resize preprocessing, for short training and accuracy runs.
"""
from edgevit.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMnist, load_fashion_mnist, write_image_folder
from edgevit.data.images import (
    IMAGE_SUFFIXES,
    CalibrationSample,
    ImageFolder,
    LoadedImages,
    Preprocessing,
    UnreadableImage,
    calibration_batch,
    open_rgb,
    preprocess,
    preprocess_files,
    to_rgb,
)

__all__ = [
    "FASHION_MNIST_CLASSES", "IMAGE_SUFFIXES", "CalibrationSample", "FashionMnist", "ImageFolder", "LoadedImages",
    "Preprocessing", "UnreadableImage", "calibration_batch", "load_fashion_mnist", "open_rgb", "preprocess",
    "preprocess_files", "to_rgb", "write_image_folder",
]
