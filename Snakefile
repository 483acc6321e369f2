# cropmap: wall-to-wall crop maps from multi-modal EO stacks.
# Thin on purpose: config, validation, rule files. All logic lives in src/cropmap.


# config.yaml, unless --configfile names other config files: then they alone are the config
# (the demo region of config.yaml is not merged into them).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/stack.smk"
include: "workflow/rules/labels.smk"
include: "workflow/rules/samples.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/mosaic.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/compare.smk"


rule all:
    default_target: True
    input:
        rules.maps.input,
        rules.report.output,
