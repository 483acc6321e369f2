rule pretrain:
    """Self-supervised MultiMAE pretraining of the imt encoder on the region's stacks (no labels used)."""
    input:
        stack=rules.stack.output,
        labels=rules.labels.output.tif,
        chips=rules.chips.output,
    output:
        f"{MODELS}/{{region}}/pretrain/imt.ckpt",
    params:
        p=params_json("pretrain"),
    log:
        f"logs/{{region}}/pretrain.log",
    conda:
        CONDA_ENV
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=min(1, gpus(config["training"])),  # pretraining uses one device
    shell:
        "CROPMAP_THREADS={threads} python -m cropmap pretrain --params {params.p:q} --stack-dir {input.stack:q}"
        " --labels {input.labels:q} --chips {input.chips:q} --out {output:q} --log {log:q}"


rule train:
    """Train a co-learning model of a region or training set (GPU with bf16 autocast when present)."""
    input:
        unpack(training_data),
        pretrained=lambda wc: pretrained_input(config["model"]["method"], wc.region),
    output:
        ckpt=f"{MODELS}/{{region}}/{{task}}/model.ckpt",
        summary=f"{MODELS}/{{region}}/{{task}}/train_summary.json",
    params:
        p=params_json("train"),
        work=f"{MODELS}/{{region}}/{{task}}/lightning",
    log:
        f"logs/{{region}}/train_{{task}}.log",
    conda:
        CONDA_ENV
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpus(config["training"]),
    shell:
        "CROPMAP_THREADS={threads} python -m cropmap train --params {params.p:q} --task {wildcards.task:q}"
        " --inputs {input:q} --out {output.ckpt:q} --summary {output.summary:q} --work-dir {params.work:q} --log {log:q}"
