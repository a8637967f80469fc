from mimo_train.model.transformer import IGNORE_INDEX, MiMoForCausalLM, MiMoModel, ModelOutput, document_ids

__all__ = ["IGNORE_INDEX", "MiMoForCausalLM", "MiMoModel", "ModelOutput", "document_ids"]
