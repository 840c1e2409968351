"""Every re-ranker: what reads DeRIS's N candidates and decides the answer.

    signatures    the candidate descriptors both re-rankers read (4 mask statistics, 675-dim grid signature)
    text_context  TextContext: the expression as a text-aware re-ranker reads it
    decision      DecisionRule, GateDecision, apply_rule: the keep-or-switch rule
    venice        the Venice-H1 gate networks (released and packaged layouts)
    calibrated    the calibrated re-ranker (candidates re-scored against the expression)
    retrieval     the calibrated re-ranker's optional retrieval memory
    files         load_gate / save_gate / save_calibrated: every re-ranker file format
    cache         the feature-cache format `deris-rerank extract` writes
    gate_data     GateData: a cache as re-ranker inputs (training, evaluation, ablation)

Nothing here imports the DeRIS model: loading a re-ranker never builds it.
"""
