"""RAN building blocks and the full network."""

from ran_bundle.networks.ran import PRESETS, RANConfig, RegistrationOutput, ResidualAlignerNetwork, preset_config

__all__ = ["PRESETS", "RANConfig", "RegistrationOutput", "ResidualAlignerNetwork", "preset_config"]
