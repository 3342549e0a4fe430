package org.deepep4j.examples;

import java.util.Map;

/**
 * What a training run measured.
 *
 * @param stepLoss         loss after each step (mean over ranks)
 * @param epochLoss        mean step loss per epoch
 * @param taskExpert       [task][expert] top-k assignments made by the router over the whole run
 * @param receivedPerExpert tokens each expert received through dispatch, over the whole run
 * @param phaseNanos       per phase, total nanoseconds of the slowest rank
 * @param seconds          wall time of training
 */
public record TrainingResult(double[] stepLoss, double[] epochLoss, long[][] taskExpert, long[] receivedPerExpert,
                             Map<String, Long> phaseNanos, double seconds) {}
