"""The jump stack: the kernel never says when a caller resumes, the stack does."""

from nftrace.trace.jumpstack import JumpStack


def test_a_jump_goes_one_level_deeper_and_its_return_comes_back():
    stack = JumpStack("input")
    assert stack.enter("input") == 0
    stack.jump("services")
    assert stack.enter("services") == 1
    stack.ret()
    assert stack.enter("input") == 0


def test_an_event_lower_on_the_stack_means_the_chains_above_it_returned():
    stack = JumpStack("forward")
    stack.jump("zones")
    stack.enter("zones")
    stack.jump("lan")
    assert stack.enter("lan") == 2
    assert stack.enter("forward") == 0
    assert stack.in_base_only("forward")


def test_a_chain_entered_without_its_jump_event_is_one_level_deeper():
    stack = JumpStack("input")
    assert stack.enter("lost_jump_target") == 1
    assert not stack.in_base_only("lost_jump_target")


def test_a_goto_replaces_the_running_chain_so_its_end_goes_back_past_it():
    stack = JumpStack("input")
    stack.jump("zones")
    stack.enter("zones")
    stack.goto("zone_lan")
    assert stack.enter("zone_lan") == 2
    stack.ret()
    assert stack.enter("input") == 0


def test_the_base_chain_starts_the_stack_again_after_a_goto_from_it_ended():
    stack = JumpStack("input")
    stack.goto("zone")
    assert stack.enter("zone") == 1
    stack.ret()
    assert stack.enter("input") == 0 and stack.in_base_only("input")
