rule pretrain:
    """Self-supervised pretraining without labels (cropmap.pretrain): imt.ckpt, the imt chip encoder
    on the region's stacks; pixel.ckpt, the pixel methods' sensor encoders on a region's or
    training set's pixels outside the test split; fold<k>/pixel.ckpt, the same on one
    comparison fold's split (compare.folds > 1)."""
    input:
        unpack(pretrain_data),
    output:
        f"{MODELS}/{{region}}/pretrain/{{ckpt}}.ckpt",
    wildcard_constraints:
        ckpt="imt|pixel|fold[0-9]+/pixel",
    params:
        p=lambda wc: dumps(stage_params(config, "pretrain", wc.region, method=pretrain_kind_of(wc))),
        kind=pretrain_kind_of,
    log:
        f"logs/{{region}}/pretrain_{{ckpt}}.log",
    conda:
        CONDA_ENV
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=min(1, gpus(config["training"])),  # pretraining uses one device
    shell:
        "CROPMAP_THREADS={threads} python -m cropmap pretrain --params {params.p:q} --kind {params.kind:q}"
        " --inputs {input:q} --out {output:q} --log {log:q}"


rule train:
    """Train a co-learning model of a region or training set (GPU with bf16 autocast when present)."""
    input:
        unpack(training_data),
        pretrained=lambda wc: pretrained_input(config["model"]["method"], wc.region, wc.task),
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
