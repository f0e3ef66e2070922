"""_observe"""
