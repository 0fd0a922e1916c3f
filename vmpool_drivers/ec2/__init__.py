"""The EC2 driver: warm instance pools through aiobotocore and asyncssh."""

from .driver import EC2VMMS, INSTANCE_SIZES, user_data

__all__ = ["EC2VMMS", "INSTANCE_SIZES", "user_data"]
