rule compare_fold:
    """Labels and chips of one fold of spatial cross-validation (compare.folds > 1)."""
    input:
        labels=rules.labels.output.tif,
        chips=rules.chips.output,
    output:
        labels=f"{DATA}/{{region}}/folds/{{fold}}/labels.tif",
        chips=f"{DATA}/{{region}}/folds/{{fold}}/chips.parquet",
    params:
        p=params_json("fold"),
    log:
        f"logs/{{region}}/compare/fold{{fold}}.log",
    conda:
        "../../envs/cropmap.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m cropmap fold --params {params.p:q} --labels {input.labels} --chips {input.chips}"
        " --fold {wildcards.fold} --out-tif {output.labels} --out-chips {output.chips} > {log} 2>&1"


rule train_compare:
    """Train one method of the comparison protocol (same splits and seed as every other)."""
    input:
        unpack(fold_inputs),
        stack=rules.stack.output,
        pretrained=lambda wc: pretrained_input(wc.method, wc.region),
    output:
        f"{MODELS}/{{region}}/compare/fold{{fold}}/{{method}}/{{task}}/model.ckpt",
    params:
        p=lambda wc: dumps(stage_params(config, "train", wc.region, method=wc.method)),
        work=f"{MODELS}/{{region}}/compare/fold{{fold}}/{{method}}/{{task}}/lightning",
    log:
        f"logs/{{region}}/compare/fold{{fold}}/train_{{method}}_{{task}}.log",
    conda:
        "../../envs/cropmap.yaml"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpus(config["training"]),
    shell:
        "CROPMAP_THREADS={threads} python -m cropmap train --params {params.p:q} --task {wildcards.task}"
        " --stack-dir {input.stack} --labels {input.labels} --chips {input.chips} --out {output}"
        " --work-dir {params.work} > {log} 2>&1"


rule evaluate_compare:
    """Score one method on every non-empty subset of sensors (held-out test split)."""
    input:
        unpack(fold_inputs),
        model=rules.train_compare.output,
        stack=rules.stack.output,
    output:
        f"{RESULTS}/compare/{{region}}/fold{{fold}}/{{method}}_{{task}}.csv",
    params:
        p=params_json("report"),
    log:
        f"logs/{{region}}/compare/fold{{fold}}/evaluate_{{method}}_{{task}}.log",
    conda:
        "../../envs/cropmap.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m cropmap report --params {params.p:q} --model {input.model} --stack-dir {input.stack}"
        " --labels {input.labels} --chips {input.chips} --out {output}"
        " --tag region={wildcards.region} --tag fold={wildcards.fold} --tag method={wildcards.method} > {log} 2>&1"


rule compare:
    """Target: results/compare/table.csv (method x subset), summary.csv and a heatmap."""
    input:
        expand(
            f"{RESULTS}/compare/{{region}}/fold{{fold}}/{{method}}_{{task}}.csv",
            region=compare_regions(config),
            fold=range(config["compare"]["folds"]),
            method=config["compare"]["methods"],
            task=compare_task(config),
        ),
    output:
        table=report(
            f"{RESULTS}/compare/table.csv",
            caption="../report/compare_table.rst",
            category="5. Method comparison",
            labels={"file": "table.csv"},
        ),
        summary=report(
            f"{RESULTS}/compare/summary.csv",
            caption="../report/compare_summary.rst",
            category="5. Method comparison",
            labels={"file": "summary.csv"},
        ),
        heatmap=report(
            f"{RESULTS}/compare/heatmap.png",
            caption="../report/compare_heatmap.rst",
            category="5. Method comparison",
            labels={"file": "heatmap.png"},
        ),
    log:
        "logs/compare.log",
    conda:
        "../../envs/cropmap.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m cropmap compare --parts {input} --table {output.table} --summary {output.summary}"
        " --heatmap {output.heatmap} > {log} 2>&1"
