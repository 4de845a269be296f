"""Data: seeded synthetic tasks (one file per task) and data modules."""

from hydra_kit.data.distant_premise import DistantPremise
from hydra_kit.data.domain_mixture import DomainMixture
from hydra_kit.data.fact_recall import FactRecall
from hydra_kit.data.logic_chains import LogicChains
from hydra_kit.data.mqar import MQAR
from hydra_kit.data.protocol import CurriculumData, TokenData, check_curriculum_data, check_token_data
from hydra_kit.data.shards import ShardDataModule as ShardDataModule
from hydra_kit.data.synthetic import SyntheticDataModule, SyntheticDataset
from hydra_kit.data.task import IGNORE_INDEX, Example, SyntheticTask
from hydra_kit.data.text import TextDataError, TextDataModule

__all__ = ["IGNORE_INDEX", "MQAR", "CurriculumData", "DistantPremise", "DomainMixture", "Example", "FactRecall", "LogicChains", "SyntheticDataModule", "SyntheticDataset", "SyntheticTask", "TextDataError", "TextDataModule", "TokenData", "check_curriculum_data", "check_token_data"]
