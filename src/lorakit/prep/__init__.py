"""Dataset preparation: tagging, captioning and metadata/image tools (sd-scripts' finetune/ and tools/ scripts).

`tagger` runs WD14-style ONNX taggers, `captioner` runs BLIP, GIT and Qwen-VL captioners from local model
folders, `metadata_tools` and `clean_rules` build and clean fine-tuning metadata files, `resize` and `canny` make
resized copies and edge images. Nothing here imports the training or model-family packages.
"""
