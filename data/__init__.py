"""Generated tasks and media, deterministic from a seed: the demo image and video (``media``,
``demo_video``), the shapes VQA task of system C (``vqa_shapes``) and the EgoSchema-format reader
with its generated set (``egoschema``)."""
