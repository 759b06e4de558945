import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Checkpoint specs and golden outputs: a copy of the project's shared specs kept in the repository
# (tests/README.md says where it comes from and how to refresh it). Nothing outside ROOT is read.
SPECS = os.path.join(ROOT, 'tests', 'data', 'specs')

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The tests that take seconds each (`python -m pytest -q --durations=60`), marked `slow` so that
# `python -m pytest -q -m "not slow"` is a subset to iterate on; CI runs everything. One list, by
# file and test name (every parametrization): command lines in a subprocess or under torchrun,
# benchmark runs, exact-solution convergence runs, and long parametrized comparisons.
SLOW = {
    'test_adm.py': ('test_golden_unet_fails_without', 'test_loader_infers_tiny_config_and_matches_network',
                    'test_rate_zero_equals_unguided',
                    'test_guidance_term_matches_finite_differences', 'test_sample_cli_subprocess',
                    'test_sample_every_solver', 'test_sample_gits_with_discrete_schedule'),
    'test_analytic.py': ('test_denoiser_batch_invariant', 'test_exact_is_converged',
                         'test_heun_many_steps_matches_exact', 'test_euler_heun_convergence_orders',
                         'test_exact_lands_on_data_for_digits', 'test_wavelet_exact_matches_closed_form',
                         'test_wavelet_trajectories_curve_where_gmm_is_straight'),
    'test_benchmarks.py': ('test_gits_benchmark_small_run', 'test_search_cost_benchmark_small_run',
                           'test_compat_benchmark_small_run', 'test_solvers_benchmark_small_run',
                           'test_presets_benchmark_small_run'),
    'test_clip_score.py': ('test_score_matches_direct_computation', 'test_two_processes_print_the_same_score',
                           'test_mismatched_prompts_fail_clearly',
                           'test_offline_without_cached_weights_fails_at_once', 'test_prompt_file_pairs_by_seed'),
    'test_cm.py': ('test_golden_unet_and_denoiser', 'test_sample_every_solver', 'test_sample_gits',
                   'test_sample_cli_and_discrete_schedule_error',
                   'test_fp16_file_is_upcast_and_computes_the_same_function', 'test_golden_fails_without',
                   'test_golden_detects_legacy_layout_and_conv1d'),
    'test_compat.py': ('test_matches_official_reference', 'test_thresholding_option',
                       'test_official_variant_orders'),
    'test_compat_search.py': ('test_search_matches_official_reference', 'test_run_json_counts_every_evaluation',
                              'test_thresholding_refused_on_latent_models'),
    'test_edm.py': ('test_full_size_config_matches_released_key_layout',
                    'test_sample_cli_downloads_once_and_runs_gits',
                    'test_sample_cli_imagenet64_labels_per_seed_and_class_idx',
                    'test_sample_cli_bad_file_is_one_line', 'test_torchrun_downloads_once_on_rank0'),
    'test_fid.py': ('test_ref_then_calc_round_trip_and_independent_stats',
                    'test_zip_folder_and_process_count_give_identical_stats', 'test_errors'),
    'test_gits.py': ('test_search_is_deterministic_and_batch_invariant',
                     'test_cost_matrices_are_computed_beside_the_next_teacher',
                     'test_afs_free_step_is_the_best_candidate', 'test_cost_matrix_matches_direct_computation',
                     'test_cost_matrix_does_not_depend_on_the_thread_count',
                     'test_torchrun_two_processes_same_schedule', 'test_save_schedules_then_sample_from_file'),
    'test_ldm.py': ('test_load_tiny_ldm_uses_ema_and_matches_golden', 'test_sample_cli_tiny_ldm'),
    'test_persistence.py': ('test_pickle_loads_where_the_class_module_is_missing',),
    'test_presets.py': ('test_list_presets_needs_no_dataset_name', 'test_cli_preset_exports_and_unknown_name',
                        'test_save_schedules_file_has_exports'),
    'test_sample.py': ('test_images_identical_across_batch_and_processes',
                       'test_pasted_schedule_reproduces_images', 'test_default_outdir_and_grid',
                       'test_default_folder_names_never_shared', 'test_digit_samples_are_digits',
                       'test_unwritable_outdir', 'test_torchrun_errors_print_once'),
    'test_sd.py': ('test_golden_unet_fails_without', 'test_cfg_batches_passes_and_rate_one_is_conditional',
                   'test_sample_cli_prompt_file', 'test_sample_cli_seed_without_prompt'),
    'test_sd_formats.py': ('test_safetensors_and_diffusers_folder_give_the_ckpt_model',
                           'test_sample_cli_takes_a_diffusers_folder',
                           'test_damaged_safetensors_is_one_line_and_writes_nothing',
                           'test_diffusers_folder_without_unet_is_one_line_and_writes_nothing'),
    'test_solvers.py': ('test_deis_mode_selects_its_table', 'test_bad_options_cli', 'test_nfe_afs_and_inters',
                        'test_convergence_order', 'test_convergence_order_ipndm', 'test_converges_with_default_recipe',
                        'test_coefficients_match_high_precision_reference',
                        'test_multistep_run_matches_reference_loop'),
    'test_student_search.py': ('test_replayed_runs_equal_fresh_runs_and_skip_the_shared_prefix',
                               'test_refinement_lowers_the_fit_objective_and_stays_ordered_within_budget',
                               'test_refinement_returns_its_start_when_the_check_rejects',
                               'test_student_refined_search_is_batch_invariant', 'test_sample_flags_end_to_end',
                               'test_refined_search_is_the_same_on_two_processes',
                               'test_kept_refinement_is_the_same_on_two_processes',
                               'test_normal_equations_do_not_depend_on_rounds_or_threads',
                               'test_check_set_is_the_seeds_after_the_warmup_ones', 'test_bad_refine_flags'),
    'test_optimal_denoiser.py': ('test_optimal_command_on_digits',),
    'test_trajectory_stats.py': ('test_stats_do_not_depend_on_the_batch_and_equal_fresh_trajectories',
                                 'test_two_processes_give_one_process_result'),
    'test_geometry.py': ('test_geometry_command',),
    'test_rotation_schedule.py': ('test_rotation_search_is_deterministic_and_batch_invariant',
                                  'test_torchrun_two_processes_same_rotation_schedule',
                                  'test_rotation_search_on_a_diffusers_pipeline'),
    'test_learned_coefficients.py': ('test_the_fit_lowers_its_objective_and_the_check_decides',
                                     'test_schedule_files_with_coefficients_round_trip_into_run_json',
                                     'test_mismatched_coefficient_files_are_refused_in_one_line'),
    'test_trajectory.py': ('test_analyze_digits_profile_and_figures', 'test_schedules_command_matches_gits_search',
                           'test_bad_flags_are_one_line_errors', 'test_throughput_benchmark_smoke'),
}


@pytest.hookimpl(tryfirst=True)          # before -m and -k deselect anything
def pytest_collection_modifyitems(config, items):
    """Mark the SLOW tests. A SLOW name that matches no test of a collected file is an error (a
    renamed slow test would otherwise run in the fast subset unnoticed); not checked when tests
    are picked by node id (file::name), which collects only part of a file."""
    seen = set()
    for item in items:
        file = os.path.basename(str(item.path))
        name = getattr(item, 'originalname', item.name)
        if name in SLOW.get(file, ()):
            item.add_marker(pytest.mark.slow)
            seen.add((file, name))
    if any('::' in arg for arg in config.args):
        return
    collected = {os.path.basename(str(item.path)) for item in items}
    stale = [f'{f}::{n}' for f, names in SLOW.items() if f in collected for n in names if (f, n) not in seen]
    if stale:
        raise pytest.UsageError(f'tests/conftest.py SLOW names no collected test: {", ".join(stale)}')


@pytest.fixture(scope='session')
def gmm():
    import models
    return models.load('gmm')


@pytest.fixture(scope='session')
def gmm_wavelet():
    import models
    return models.load('gmm_wavelet')


@pytest.fixture(scope='session')
def digits():
    import models
    return models.load('digits')
