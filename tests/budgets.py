"""Tiny training budgets shared by the tests that run the entry points.

64-px crops, 32-px HRDA detail crops, small val images and 4-px MIC blocks:
seconds per run on a CPU, every code path of the full recipe still taken.
"""

TINY_TRAINING_OPTIONS = [
    "data.source.crop_size=[64,64]",
    "data.target.crop_size=[64,64]",
    "data.source.img_scale=[128,64]",
    "data.target.img_scale=[128,72]",
    "data.rare_class_sampling.min_pixels=12",
    "teacher.model.hr_crop_size=[32,32]",
    "student.model.hr_crop_size=[32,32]",
    "teacher.model.test_cfg.crop_size=[64,64]",
    "teacher.model.test_cfg.stride=[32,32]",
    "student.model.test_cfg.crop_size=[64,64]",
    "student.model.test_cfg.stride=[32,32]",
    "uda.mask_generator.mask_block_size=4",
    "log_config.interval=1",
]
